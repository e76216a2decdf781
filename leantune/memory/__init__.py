"""Memory-saving backprop: approximate activation backward, memory-sharing norms, profiler, model patching."""
