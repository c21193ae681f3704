"""TensorRT engine builds: the two TensorRT flavours behind one adapter, profiles, side files, reports."""
