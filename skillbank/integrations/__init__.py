"""The edges: the command line, LightningCLI, a finetuning LightningModule, your own data, plots and reports."""
