"""Token policies: each decides, at block boundaries, which tokens go on."""
