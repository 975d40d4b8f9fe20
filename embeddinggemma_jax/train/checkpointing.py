"""The whole train state in Orbax: parameters, optimiser state, step, RNG, data position.

Arrays go through ``StandardSave`` (restored straight into their shardings); the data position,
the train config and the base model path go into a JSON item next to them, so a checkpoint is
enough to resume a run or to export a sentence-transformers folder.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class TrainCheckpoints:
    def __init__(self, directory, keep: int = 3):
        import os

        from embeddinggemma_jax.storage import EMULATOR, epath, is_object_store

        remote = is_object_store(directory)
        # gs://: Orbax writes there itself (TensorStore's GCS driver for the arrays). A step is written in place
        # and committed by commit_success.txt: a step a kill left uncommitted is removed when the manager starts.
        self.directory = epath(directory) if remote else Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=remote)
        handlers = None
        if remote and os.environ.get(EMULATOR):
            # OCDBT (Orbax's default array layout) commits its manifest by conditional writes (if-generation-match
            # on the generation read back); the GCS emulator sends no object generations and ignores preconditions,
            # so TensorStore fails "Malformed StorageGeneration" once a save commits twice. Against the emulator the
            # arrays are written one zarr array per leaf instead (restore reads either layout).
            handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=False), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"),
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()


    def save(self, step: int, state, meta: dict) -> None:
        """Asynchronous: training continues while the arrays are written; ``wait`` joins."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state, shardings, step: int | None = None):
        """(state, meta) of ``step`` (default: the latest), arrays placed on ``shardings``."""
        step = self._step(step)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def _step(self, step):
        if step is None:
            step = self.manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory} holds no checkpoint; train first or pass the run's "
                                        "--output-dir")
        elif step not in self.manager.all_steps():
            raise FileNotFoundError(f"{self.directory} has no checkpoint for step {step} "
                                    f"(it has {sorted(self.manager.all_steps())})")
        return step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
