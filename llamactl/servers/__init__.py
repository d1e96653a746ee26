"""llama-server processes: probing the binary, building argv, reading its buffer logs."""
