"""eva-ray's actors: one plain class per role (rollout, reward, creator, learner).

Each class owns one resource and runs inline without Ray; ``ray.remote`` is applied only at launch.
"""
