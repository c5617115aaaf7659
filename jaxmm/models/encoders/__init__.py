"""Vision (and audio) towers shared by multimodal models."""
