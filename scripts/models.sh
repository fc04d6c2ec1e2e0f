# The backdoored models the results scripts know, by name (<dev|own>-<trigger>): each one's target class. Its
# trigger is scripts/triggers/<name>.json. Sourced by attack-own.sh and results-models.sh.
declare -A target=([dev-badnets]=1 [dev-blend]=6 [dev-sig]=2 [dev-patch]=8
                   [own-warp]=0 [own-blend]=3 [own-badnets]=7 [own-sig]=4 [own-patch]=9
                   [own-preact-badnets]=7)
# Each model's architecture where it is not WRN-16-1.
declare -A arch=([own-preact-badnets]=preact-resnet18)

arch_of() { echo "${arch[$1]:-wrn-16-1}"; }

# The checkpoint's file name: wrn16_1-own_warp.safetensors, preact-resnet18-own_preact-badnets.safetensors.
checkpoint_of() {
  local name
  name=$(arch_of "$1")
  echo "${name/wrn-16-1/wrn16_1}-${1/-/_}.safetensors"
}
