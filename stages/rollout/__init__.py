"""Rollout: sampling solutions from the policy, splitting them into steps, checking final answers."""
