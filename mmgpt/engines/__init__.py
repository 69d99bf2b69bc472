"""TensorRT engines built from an artifacts directory, and their inspection."""
