"""The torch fine-tune bridge (imports torch; never imported by `import onnxvq`)."""
