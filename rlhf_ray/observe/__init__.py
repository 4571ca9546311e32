"""What a person sees of a run: the console, the metrics sinks, plots, run directories and the
filter that keeps known dependency notices quiet."""
