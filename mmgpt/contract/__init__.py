"""The contract between export and everything after it: graph declarations, the manifest, the artifacts
directory and its weights file."""
