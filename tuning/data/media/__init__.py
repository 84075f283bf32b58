"""Pictures and videos: loaded within limits (images.py, videos.py), resized by the model's own processor with the
run's options (resolution.py), and seen as the processor sees them (processor.py)."""
