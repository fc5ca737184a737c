"""What L&S is compared with: global merging baselines and the continual (arrival-by-arrival) picture."""
