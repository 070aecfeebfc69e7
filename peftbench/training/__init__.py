"""The Lightning side of a run: the module that trains, its callbacks, the schedule, the loggers, weight decay."""
