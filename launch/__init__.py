"""eva-ray's launch layer: the command line, the driver and cluster placement."""
