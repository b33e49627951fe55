"""The `qtm` console script: a typed table of contents of the project's commands (qtm.commands).

Commands that need torch import it inside their body, so `qtm simulate` and `qtm fit` start without torch.
`python -m qtm.cli` runs the same app (e.g. under `accelerate launch -m qtm.cli chain run ...`).
"""

from __future__ import annotations

import typer

from qtm.commands.assay import assay
from qtm.commands.chain_export import export
from qtm.commands.chain_run import conditions, run
from qtm.commands.demo import demo
from qtm.commands.fit import fit
from qtm.commands.recommend import recommend, recommend_check
from qtm.commands.report import report
from qtm.commands.simulate import simulate
from qtm.commands.spectra import spectra

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
    # The theory and fitting code work in float64 (float32 loses the far tails).
    import jax

    jax.config.update("jax_enable_x64", True)


app.command("simulate")(simulate)
app.command("spectra")(spectra)
chain_app.command("run")(run)
chain_app.command("conditions")(conditions)
chain_app.command("export")(export)
app.command("fit")(fit)
app.command("assay")(assay)
app.command("recommend")(recommend)
app.command("recommend-check")(recommend_check)
app.command("report")(report)
app.command("demo")(demo)

if __name__ == "__main__":  # `python -m qtm.cli ...`, e.g. under `accelerate launch -m qtm.cli`
    app()
