"""Red-team tools: traffic (benign and attacking), attacks over HTTP, clone training, reports."""
