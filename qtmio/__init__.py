"""qtmio: the files every package writes and reads, with neither torch nor JAX.

The one package that qtm, chain and fitting may all import, and which imports none of them:

- `qtmio.atomic`: atomic writes of files and folders (a reader, or a writer killed half-way, never sees a
  partial file): datasets, figures, images, reports, model and adapter folders are written through it.
- `qtmio.netcdf`: datasets to and from netCDF4/HDF5 (h5netcdf), written atomically.
- `qtmio.contract`: the results contract between the chain and the fit (docs/results-contract.md):
  file and variable names, the schema version, validation.
- `qtmio.provenance`: creation time, git revision, package versions, seed and command for dataset attrs.
- `qtmio.figures`: matplotlib figures without pyplot state, saved atomically.
- `qtmio.images`: the image files of a folder.
- `qtmio.strict_json`: strict JSON for `--json` and log.jsonl (NaN as null, infinities as "inf"/"-inf").
- `qtmio.errors`: `LibraryError`, the base of every library's errors, and the contract's `ContractError`.
"""
