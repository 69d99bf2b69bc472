"""The typed, versioned formats between stages, each read and written in one place: graph declarations, the manifest
and its engine config and build record, the artifacts directory and its weights file, and the checkpoint's mmgpt
entry."""
