"""The shell: every `qtm` command, one module each, and what they share (`common`).

    simulate  qtm.commands.simulate   the trait model's trajectory and Monte Carlo (qtm)
    spectra   qtm.commands.spectra    the phenotype of a folder of images (chain.spectra)
    chain run qtm.commands.chain_run  run or continue a Chain of Diffusion (chain.run)
    fit       qtm.commands.fit        selection per condition from a run's phenotypes (fitting)
    report    qtm.commands.report     figures and report.md of a run folder (chain.report, fitting)
    demo      qtm.commands.demo       chain, fit and report on the embedded toy world

A command checks its arguments, builds the library's configuration, calls the library, writes what was
asked for and prints a table or JSON. It holds no mathematics. Library errors (qtmio.errors.LibraryError)
become one line on stderr and exit code 2 in one place, `common.reported`, which also shows the command's
flags where a message names a library parameter. The libraries (qtm, chain, fitting, qtmio) never import
this package. Heavy imports (torch, diffusers) happen inside the commands that need them, so `qtm simulate`
and `qtm fit` start without torch.
"""
