"""One router per resource: health, info, sessions, calls, states, metrics."""
