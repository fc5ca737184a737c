"""What the tests share: ``models`` (tiny transformers, skills, the reference stitch), ``modules``
(small LightningModules and loaders for the callbacks), ``banks`` (manifests and skill files as an attacker
rewrites them), ``ddp_teardown`` (the DDP child scripts' orderly exit)."""

#: Seconds a multi-process (DDP) test may run: a hung collective never returns, so any limit catches it; this one
#: holds on a box 10x slower than an idle CI one (the slowest DDP test takes ~35 s idle).
DDP_TIMEOUT = 1200
