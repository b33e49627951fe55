"""Inference of selection from chain data: `qtm fit` (docs/model.md section 6; docs/results-contract.md).

Modules: `observations` (read and validate a results dataset), `model` (parameters, transforms, objective),
`optimize` (multi-start L-BFGS-B), `uncertainty` (Laplace, profile, bootstrap, identifiability), `forecast`
(bands, goodness of fit, forecasts), `compare` (AIC/BIC across variants), `driver` (one fit end to end),
`results` (fit dataset, JSON, tables), `plotting` and `errors`. The command line is qtm.commands.fit.

Public JAX entry points need float64: `jax.config.update("jax_enable_x64", True)` at program start.
"""
