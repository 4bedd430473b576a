"""The SPINAL tab of TensorBoard: what a person sees first of a run the callback watched.

``run_view`` reads a run's files (trace history, event log, reference trace) into plain JSON
types; ``plugin.SpinalPlugin`` serves them and the tab's script to TensorBoard. Nothing here is
imported by the callback: it runs in the TensorBoard process.
"""
