"""GPU inventory: live (NVML) or simulated, one frozen type for both."""
