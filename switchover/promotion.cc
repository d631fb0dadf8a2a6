// Endpoints, the commands a host runs (fencing, before running unprotected), and the rule for
// who may promote.
#include <unistd.h>

#include <algorithm>
#include <charconv>

#include "absl/strings/str_cat.h"
#include "switchover/switchover.h"

namespace romulus::switchover {

absl::StatusOr<Endpoint> ParseEndpoint(absl::string_view text) {
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not ADDR:PORT"));
  };
  size_t colon = text.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return bad();
  absl::string_view host = text.substr(0, colon), port = text.substr(colon + 1);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return bad();
    host = host.substr(1, host.size() - 2);
  }
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || port.empty() || value > 65535) {
    return bad();
  }
  return Endpoint{std::string(host), static_cast<uint16_t>(value)};
}

absl::Status AuthorizePromotion(const PromotionPolicy& policy, bool force) {
  absl::Status s;
  if (policy.lease != nullptr) {
    policy.lease->SetStateTerm(policy.state_term);
    s = policy.lease->AcquireWithin(policy.wait, policy.promotion);
    if (!s.ok()) policy.lease->Want(false);
  } else if (!policy.fence_command.empty()) {
    s = RunFenceCommand(policy.fence_command, policy.wait);
  } else {
    s = absl::FailedPreconditionError(
        "neither a witness nor a fencing command is configured, so the old primary may still be "
        "running: not promoting (an operator who knows it is down can run romulus promote "
        "--force)");
  }
  if (s.ok() || force) return absl::OkStatus();
  return s;
}

}  // namespace romulus::switchover
