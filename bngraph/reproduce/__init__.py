"""The paper's experiments, one module each: `mnist` (Sec. 4.1, Figure 1) and `inception`
(Sec. 4.2.2, whose variants `recipes` builds). They sit above `bngraph.training` and the API:
an experiment builds its BN models with `bngraph.insert` and trains them with `bngraph.train`.
`workers` runs the MNIST nets in processes; `tables` holds what both summaries share.
"""
