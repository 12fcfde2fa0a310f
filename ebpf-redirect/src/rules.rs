//! Address rules (`CIDR[:PORT]`) and how they come from `NetworkPolicy` / `Service` documents.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;
use meshgate_policy::scope::network_policy_applies;
use meshgate_spiffe::SpiffeId;

/// A destination rule: a CIDR and a port (0 = every port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub net: IpNet,
    pub port: u16,
}

impl Rule {
    pub fn new(net: IpNet, port: u16) -> Self {
        Rule {
            net: net.trunc(),
            port,
        }
    }

    /// The address as the programs see it: IPv4 as `::ffff:a.b.c.d`, and the prefix length in
    /// bits of that 128-bit form.
    pub(crate) fn mapped(&self) -> ([u8; 16], u32) {
        match self.net {
            IpNet::V4(n) => (
                n.network().to_ipv6_mapped().octets(),
                96 + u32::from(n.prefix_len()),
            ),
            IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.net, self.port) {
            (net, 0) => write!(f, "{net}"),
            (IpNet::V6(net), port) => write!(f, "[{net}]:{port}"),
            (net, port) => write!(f, "{net}:{port}"),
        }
    }
}

/// `10.0.0.0/8`, `10.0.0.1` (a host), `10.0.0.0/8:443`, `[fd00::/8]:443`, `::1`.
impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "{s:?}: {why} (examples: 10.0.0.0/8, 10.0.0.5:443, 10.0.0.0/8:443, [fd00::/8]:443)"
            )
        };
        let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
            let (a, p) = rest.split_once(']').ok_or_else(|| bad("missing ]"))?;
            let p = match p.strip_prefix(':') {
                Some(p) => p,
                None if p.is_empty() => "0",
                None => return Err(bad("expected :PORT after ]")),
            };
            (a, p)
        } else if s.matches(':').count() == 1 {
            s.split_once(':').unwrap()
        } else {
            (s, "0")
        };
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        let net = if addr.contains('/') {
            IpNet::from_str(addr).map_err(|_| bad("bad CIDR"))?
        } else {
            IpNet::from(IpAddr::from_str(addr).map_err(|_| bad("bad address"))?)
        };
        Ok(Rule::new(net, port))
    }
}

/// Loopback, always exempt unless switched off: 127.0.0.0/8 and ::1.
pub fn loopback() -> [Rule; 2] {
    [
        Rule::new(
            IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).unwrap(),
            0,
        ),
        Rule::new(IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)), 0),
    ]
}

/// What a policy file or directory contributes to the eBPF maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRules {
    /// `NetworkPolicy` egress rules: every CIDR × every port (port 0 when the rule names none).
    pub egress_allow: Vec<Rule>,
    /// The IP literals among `Service.hosts`: mesh destinations, redirected to the sidecar.
    pub mesh: Vec<Rule>,
}

/// Why a policy file or directory gave no rules.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyRulesError(#[from] pub meshgate_policy::LoadErrors);

/// Reads `NetworkPolicy` egress allowlists and `Service` IP hosts from a policy file or
/// directory (validated exactly as the sidecar validates it). With `workload`, only the
/// NetworkPolicies that apply to it are read — the scoping rule of every other document
/// ([`meshgate_policy::scope::network_policy_applies`]: its namespace or the root namespace, and
/// a selector naming its account or none); without, every NetworkPolicy.
pub fn from_policy(
    path: &Path,
    workload: Option<&SpiffeId>,
) -> Result<PolicyRules, PolicyRulesError> {
    let set = if path.is_dir() {
        meshgate_policy::load_dir(path)?
    } else {
        let mut set = meshgate_policy::PolicySet::default();
        meshgate_policy::parse_file(path, &mut set)?;
        set
    };
    let mut out = PolicyRules::default();
    for np in &set.network_policies {
        if workload.is_some_and(|w| !network_policy_applies(np, w)) {
            continue;
        }
        for rule in &np.spec.egress {
            for net in &rule.to {
                if rule.ports.is_empty() {
                    out.egress_allow.push(Rule::new(*net, 0));
                }
                for port in &rule.ports {
                    out.egress_allow.push(Rule::new(*net, *port));
                }
            }
        }
    }
    for svc in &set.services {
        for host in &svc.spec.hosts {
            if let Ok(ip) = host.parse::<IpAddr>() {
                out.mesh.push(Rule::new(IpNet::from(ip), 0));
            }
        }
    }
    out.egress_allow.sort();
    out.egress_allow.dedup();
    out.mesh.sort();
    out.mesh.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let r: Rule = "10.0.0.0/8:443".parse().unwrap();
        assert_eq!(r.to_string(), "10.0.0.0/8:443");
        assert_eq!(
            "10.1.2.3".parse::<Rule>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            "10.1.2.3/8".parse::<Rule>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("::1".parse::<Rule>().unwrap().to_string(), "::1/128");
        assert_eq!(
            "[fd00::/8]:53".parse::<Rule>().unwrap().to_string(),
            "[fd00::/8]:53"
        );
        assert!("10.0.0.0/33".parse::<Rule>().is_err());
        assert!("10.0.0.1:99999".parse::<Rule>().is_err());
        let (addr, bits) = "10.0.0.0/8".parse::<Rule>().unwrap().mapped();
        assert_eq!(bits, 104);
        assert_eq!(&addr[10..13], &[0xff, 0xff, 10]);
    }

    #[test]
    fn reads_network_policy_and_services() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("np.yaml"),
            "apiVersion: meshgate.dev/v1\nkind: NetworkPolicy\nmetadata: { name: n, namespace: shop }\nspec:\n  egress:\n    - to: [\"10.9.0.0/16\"]\n      ports: [443, 80]\n    - to: [\"192.0.2.1/32\"]\n---\napiVersion: meshgate.dev/v1\nkind: NetworkPolicy\nmetadata: { name: other, namespace: shop }\nspec:\n  selector: { account: db }\n  egress:\n    - to: [\"10.8.0.0/16\"]\n---\napiVersion: meshgate.dev/v1\nkind: Service\nmetadata: { name: orders, namespace: shop }\nspec:\n  identity: spiffe://mesh.local/ns/shop/sa/orders\n  hosts: [orders, 10.199.0.2]\n  endpoints: [\"10.199.0.2:15006\"]\n",
        )
        .unwrap();
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let r = from_policy(dir.path(), Some(&id("spiffe://mesh.local/ns/shop/sa/web"))).unwrap();
        let allow: Vec<String> = r.egress_allow.iter().map(Rule::to_string).collect();
        assert_eq!(allow, ["10.9.0.0/16:80", "10.9.0.0/16:443", "192.0.2.1/32"]);
        assert_eq!(r.mesh[0].to_string(), "10.199.0.2/32");
        let all = from_policy(dir.path(), None).unwrap();
        assert_eq!(all.egress_allow.len(), 4);
        // Scoped by namespace too: `web` in another namespace gets none of shop's rules, and
        // `db` in shop gets the unselected policy and its own.
        let other = from_policy(
            dir.path(),
            Some(&id("spiffe://mesh.local/ns/billing/sa/web")),
        );
        assert!(other.unwrap().egress_allow.is_empty());
        let db = from_policy(dir.path(), Some(&id("spiffe://mesh.local/ns/shop/sa/db"))).unwrap();
        assert_eq!(db.egress_allow.len(), 4);
    }
}
