"""Pictures and pages: HTML reports, covariance plots, image grids, attention pictures."""
