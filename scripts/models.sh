# The backdoored models the results scripts know, by name (<dev|own>-<trigger>): each one's target class. Its
# trigger is scripts/triggers/<name>.json. Sourced by attack-own.sh and results-models.sh.
declare -A target=([dev-badnets]=1 [dev-blend]=6 [dev-sig]=2 [dev-patch]=8
                   [own-warp]=0 [own-blend]=3 [own-badnets]=7 [own-sig]=4 [own-patch]=9)
