"""The decode loop: backends (built from an artifacts directory), sampling, and the generator."""
