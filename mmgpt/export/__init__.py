"""export.py's work: checkpoint -> ONNX graphs + weights.bin + manifest (+ hf/), parity, engines."""
