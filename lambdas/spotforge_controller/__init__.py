"""spotforge controller: a level-triggered reconciler for one Forgejo node, its data volume and its Elastic IP."""
