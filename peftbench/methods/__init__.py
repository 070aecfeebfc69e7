"""PEFT methods. Each file holds one method; ``conf/method/<name>.yaml`` is the registry."""
