"""The pure core: GGUF header → hyperparameters → memory per device."""
