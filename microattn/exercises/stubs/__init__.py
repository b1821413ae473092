"""The files ``microattn exercise start N DIR`` copies: each function to fill in raises
NotImplementedError until the learner writes it."""
