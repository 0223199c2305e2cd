"""Performance harness (not run by the test suite)."""
