"""What a run's agents release, and what it costs them: the schedule of one batch, the plan of a
run, the calibration of its noise, each agent's account, the run's report."""
