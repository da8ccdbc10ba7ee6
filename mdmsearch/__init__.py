"""mdmsearch: automated search over multivariate diffusion processes.

The package is layered: ``mdmsearch.diffusion`` (forward processes, independent of
training), ``mdmsearch.objectives`` (ELBO, time sampling, bits per dimension), then
training, search and reporting on top.
"""

__version__ = "0.1.0"
