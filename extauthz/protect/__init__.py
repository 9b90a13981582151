"""Response protection: less detail, argmax-preserving noise, watermarks."""
