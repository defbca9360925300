"""Trajectory knowledge base (ReDi-style retrieval start) that lives on disk.

A KB holds, per entry (prompt x seed), the latent at an early *key step* and the latents at later
*value steps* of one full generation. A new generation runs to the key step, looks up its nearest
entries, blends their values and continues from a value step, skipping the steps in between.

  store.py      the KB folder: its manifest (`kb.json`, written last), checksums, memory-mapped arrays,
                the read-only memory-mapped faiss indexes and their exact re-ranking
  index.py      faiss index training from a factory string (PCA/OPQ + IVF + PQ), sizes, search options
  adaptive.py   how far a query may jump: thresholds from the KB's own leave-one-out distances
  build.py      build (checkpointed, resumable, sharded) and merge
  retrieval.py  the retrieval start: drives the pipeline's parts (encode_prompt, denoise, decode)
  evaluate.py   recall against exact search, lookup latency, and quality on the reference model

Above `effdiff.runtime` (it drives the runtime's parts; the runtime never imports it).
"""
