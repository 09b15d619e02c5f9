"""The end-to-end tests' stack is the session-scoped `stack` fixture in tests/conftest.py, shared with the browser
tests (tests/browser/) so that a session starts one embedded platform, not one per folder."""
