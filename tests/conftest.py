import os

# Nothing may be fetched from a model hub, in tests least of all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
