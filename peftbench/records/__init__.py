"""What a run leaves behind and how its folder is kept: results.json and the index, the task file, the run-folder
lock and the signal records."""
