"""The `qtm` console script: a typed table of contents of the project's commands.

Each command lives beside the library it drives; commands that need torch import it inside their body,
so `qtm simulate` and `qtm fit` start without torch.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="qtm",
    no_args_is_help=True,
    add_completion=False,
    help="Quantitative-trait modeling of model collapse in the Chain of Diffusion.",
)
chain_app = typer.Typer(no_args_is_help=True, help="The Chain of Diffusion experiment (torch).")
app.add_typer(chain_app, name="chain")


@app.callback()
def _main() -> None:
    """Theory (simulate), experiment (chain, spectra), inference (fit), reports (report, demo)."""
    # The theory and fitting code work in float64 (REFERENCE.md: float32 loses the far tails).
    import jax

    jax.config.update("jax_enable_x64", True)


def _register() -> None:
    from chain.run_command import run
    from chain.spectra_command import spectra
    from fitting.fit_command import fit
    from qtm.commands.assay import assay
    from qtm.demo_command import demo
    from qtm.report_command import report
    from qtm.simulate_command import simulate

    app.command("simulate")(simulate)
    app.command("spectra")(spectra)
    chain_app.command("run")(run)
    app.command("fit")(fit)
    app.command("report")(report)
    app.command("demo")(demo)
    app.command("assay")(assay)


_register()

if __name__ == "__main__":  # `python -m qtm.cli ...`, e.g. under `accelerate launch -m qtm.cli`
    app()
