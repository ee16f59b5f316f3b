"""Knowledge suites, their runner, the promotion gate and training-time evaluation."""
