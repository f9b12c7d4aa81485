"""The speculative loop and what steers it: token choice, sampling, draft-length policies, calibration."""
