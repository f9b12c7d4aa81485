"""What each model family needs, and (later) the embedded default model pair."""
