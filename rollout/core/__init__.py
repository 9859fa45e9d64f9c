"""The pure decision core: types, weight plans, sequential statistics and the state machine.

Nothing in this package performs I/O, reads a clock or logs; `import-linter` enforces it. The
controller (`rollout.controller`) observes, calls the core, and applies what it decides.
"""
