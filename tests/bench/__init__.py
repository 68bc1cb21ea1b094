"""Tests of echo_async.bench, the load tester."""
