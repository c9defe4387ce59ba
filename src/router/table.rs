//! The prefix tables behind the router: a longest-prefix-match map over
//! both address families ([`PrefixMap`], one hash map per prefix length)
//! and the fast hasher of its integer keys.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// Host bits cleared; an IPv4-mapped IPv6 CIDR (`::ffff:10.0.0.0/104`)
/// becomes its IPv4 CIDR.
pub(super) fn canonical_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net {
        if let Some(len) = v6.prefix_len().checked_sub(96) {
            if let Some(v4) = v6.network().to_ipv4_mapped() {
                if let Ok(v4net) = Ipv4Net::new(v4, len) {
                    return IpNet::V4(v4net);
                }
            }
        }
    }
    net
}

/// A hash map with [`FastHasher`].
pub(super) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A multiply-rotate hasher for the integer keys of the router's maps. The
/// keys come from the inventory and the configuration, never from clients,
/// so it needs no protection against chosen collisions; it folds the high
/// bits into the low ones so that keys differing only in their upper bytes
/// (network prefixes) spread over the buckets.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FastHasher(u64);

impl FastHasher {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(Self::MULTIPLIER);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            for (dst, src) in word.iter_mut().zip(chunk) {
                *dst = *src;
            }
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_u128(&mut self, n: u128) {
        // Low 64 bits, then high 64 bits.
        self.mix(n as u64);
        self.mix((n >> 64) as u64);
    }
}

/// An address as an unsigned integer that can be masked to a prefix.
pub(super) trait PrefixKey: Copy + Eq + Hash {
    /// Address length in bits.
    const BITS: u8;
    /// The first `len` bits, the rest cleared.
    fn masked(self, len: u8) -> Self;
}

impl PrefixKey for u32 {
    const BITS: u8 = 32;
    fn masked(self, len: u8) -> u32 {
        self & u32::MAX
            .checked_shl(u32::from(<Self as PrefixKey>::BITS.saturating_sub(len)))
            .unwrap_or(0)
    }
}

impl PrefixKey for u128 {
    const BITS: u8 = 128;
    fn masked(self, len: u8) -> u128 {
        self & u128::MAX
            .checked_shl(u32::from(<Self as PrefixKey>::BITS.saturating_sub(len)))
            .unwrap_or(0)
    }
}

/// Prefixes of one address family: one hash map per prefix length, probed
/// from the longest length present to the shortest.
struct LenTable<K, V> {
    /// Indexed by prefix length; keys are masked network addresses.
    maps: Vec<FastMap<K, (IpNet, V)>>,
    /// The lengths whose map is not empty, longest first.
    lens: Vec<u8>,
}

impl<K: PrefixKey, V> Default for LenTable<K, V> {
    fn default() -> Self {
        LenTable {
            maps: (0..=K::BITS).map(|_| FastMap::default()).collect(),
            lens: Vec::new(),
        }
    }
}

impl<K: PrefixKey, V> LenTable<K, V> {
    fn get(&self, key: K, len: u8) -> Option<&V> {
        self.maps
            .get(usize::from(len))?
            .get(&key.masked(len))
            .map(|(_, v)| v)
    }

    fn insert(&mut self, key: K, len: u8, net: IpNet, value: V) {
        if let Some(map) = self.maps.get_mut(usize::from(len)) {
            map.insert(key.masked(len), (net, value));
        }
    }

    fn finish(&mut self) {
        for map in &mut self.maps {
            map.shrink_to_fit();
        }
        self.lens = (0..=K::BITS)
            .rev()
            .filter(|len| {
                self.maps
                    .get(usize::from(*len))
                    .is_some_and(|map| !map.is_empty())
            })
            .collect();
    }

    fn longest(&self, addr: K) -> Option<(&IpNet, &V)> {
        self.lens.iter().find_map(|len| {
            self.maps
                .get(usize::from(*len))?
                .get(&addr.masked(*len))
                .map(|(net, v)| (net, v))
        })
    }

    fn len(&self) -> usize {
        self.maps.iter().map(HashMap::len).sum()
    }

    fn iter(&self) -> impl Iterator<Item = (&IpNet, &V)> {
        self.maps
            .iter()
            .flat_map(|map| map.values().map(|(net, v)| (net, v)))
    }
}

/// A longest-prefix-match table over both address families. Insert canonical
/// networks (see [`canonical_net`]), then call [`PrefixMap::finish`] before
/// looking up.
pub(super) struct PrefixMap<V> {
    v4: LenTable<u32, V>,
    v6: LenTable<u128, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            v4: LenTable::default(),
            v6: LenTable::default(),
        }
    }
}

impl<V> PrefixMap<V> {
    /// The value stored for exactly `net`.
    pub(super) fn get(&self, net: IpNet) -> Option<&V> {
        match net {
            IpNet::V4(n) => self.v4.get(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.get(u128::from(n.network()), n.prefix_len()),
        }
    }

    /// Store `value` for `net`, replacing what was there.
    pub(super) fn insert(&mut self, net: IpNet, value: V) {
        match net {
            IpNet::V4(n) => self
                .v4
                .insert(u32::from(n.network()), n.prefix_len(), net, value),
            IpNet::V6(n) => self
                .v6
                .insert(u128::from(n.network()), n.prefix_len(), net, value),
        }
    }

    /// Index the prefix lengths present; call after the last insert.
    pub(super) fn finish(&mut self) {
        self.v4.finish();
        self.v6.finish();
    }

    /// The longest prefix containing `ip`, and its value.
    pub(super) fn longest(&self, ip: IpAddr) -> Option<(&IpNet, &V)> {
        match ip {
            IpAddr::V4(a) => self.v4.longest(u32::from(a)),
            IpAddr::V6(a) => self.v6.longest(u128::from(a)),
        }
    }

    /// How many prefixes it holds.
    pub(super) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Every prefix and its value, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&IpNet, &V)> {
        self.v4.iter().chain(self.v6.iter())
    }
}
