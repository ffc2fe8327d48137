# The adpop campaign snapshot payload: the ONLY copy of this schema. The Python compiler
# (pycapnp) writes it and the C++ engine compiles this same file with capnpc.
#
# The engine reads a payload in place from an mmap and builds nothing at swap time, so
# everything it needs is precompiled here: strings are interned (referenced by index into
# `strings`), every table is a flat array referenced by index, and the targeting index is a
# k-index (Whang et al., "Indexing Boolean Expressions", VLDB 2009) ready to walk.
#
# Compatibility: fields are only ever added (new ordinals); a change that breaks readers bumps
# the manifest schema id (the file id below) instead.

@0xa1387dd9f2dc5b7d;

using StringId = UInt32;  # index into Payload's string table; 0 is the empty string

struct Payload {
  version @0 :UInt64;          # same as the manifest's version
  createdAt @1 :Int64;         # unix seconds
  retiredStrings @2 :List(Text);  # unwritten: the table is stringBlob + stringOffsets
  advertisers @3 :List(Advertiser);
  creatives @4 :List(Creative);
  campaigns @5 :List(Campaign);
  ads @6 :List(Ad);            # grouped by campaign: campaign i owns ads[adsStart, adsStart+adsCount)
  placements @7 :List(Placement);   # sorted by id bytes, for binary search by request placement id
  index @8 :TargetingIndex;
  stats @9 :Stats;
  # This file's id (the @0x... above). The manifest carries it too; the engine checks it here
  # so it never has to parse the manifest's JSON.
  schemaId @10 :UInt64;
  # Campaign.start and .end again as flat columns (by campaign index): most weighted draws
  # end at the flight check, and these keep it to two plain reads.
  campaignStarts @11 :List(Int64);
  campaignEnds @12 :List(Int64);
  # The interned strings packed: string i is stringBlob[stringOffsets[i], stringOffsets[i + 1]),
  # and string 0 is "". One pointer and two reads per string on the engine's answer path,
  # where a List(Text) costs a pointer decode per element.
  stringBlob @13 :Data;
  stringOffsets @14 :List(UInt32);
}

struct Advertiser {
  id @0 :StringId;
  name @1 :StringId;
  idHash @2 :UInt32;           # crc32(id), as Campaign.idHash
  # The distinct windows of the advertiser-scope caps on any of its active campaigns, sorted:
  # an impression of ANY of its campaigns counts toward each, including campaigns that carry
  # no cap of their own.
  capWindows @3 :List(UInt32);
}

enum CreativeKind {
  image @0;
  html @1;
  video @2;
  native @3;
}

struct Creative {
  id @0 :StringId;
  advertiser @1 :UInt32;       # index into Payload.advertisers
  kind @2 :CreativeKind;
  width @3 :UInt16;
  height @4 :UInt16;
  body @5 :StringId;           # inline markup, or 0
  url @6 :StringId;            # asset URL, or 0
  landingUrl @7 :StringId;
}

enum Pacing {
  even @0;
  asap @1;
  frontloaded @2;
}

enum CapScope {
  campaign @0;
  advertiser @1;
}

struct FrequencyCap {
  count @0 :UInt32;
  windowSeconds @1 :UInt32;
  scope @2 :CapScope;
}

struct Campaign {
  id @0 :StringId;
  advertiser @1 :UInt32;       # index into Payload.advertisers
  name @2 :StringId;
  start @3 :Int64;             # unix seconds, inclusive
  end @4 :Int64;               # unix seconds, exclusive
  priority @5 :UInt8;          # tier: 1 is served first, 16 last
  weight @6 :UInt32;
  ecpmMicros @7 :UInt64;
  budgetTotalMicros @8 :UInt64;   # 0: unlimited
  budgetDailyMicros @9 :UInt64;   # 0: unlimited
  pacing @10 :Pacing;
  caps @11 :List(FrequencyCap);
  exclusionLabels @12 :List(StringId);   # sorted
  adsStart @13 :UInt32;
  adsCount @14 :UInt32;
  # Share of eligible requests this campaign may try to win, in parts per million, before
  # local spend pacing. The compiler writes 1000000; the origin lowers it for campaigns its
  # forecast says would overspend.
  passThroughPpm @15 :UInt32;
  # This campaign's conjunctions (a slice of TargetingIndex.campaignConjunctions), for
  # evaluating its targeting directly; none means it matches every request.
  conjunctionsStart @16 :UInt32;
  conjunctionsCount @17 :UInt32;
  idHash @18 :UInt32;          # crc32(id) (zlib's): keys caps and local spend across swaps
}

struct Ad {
  id @0 :StringId;
  campaign @1 :UInt32;         # index into Payload.campaigns
  creative @2 :UInt32;         # index into Payload.creatives
  weight @3 :UInt32;
  width @4 :UInt16;            # the creative's size, copied so size checks stay on the ad
  height @5 :UInt16;
}

struct Size {
  width @0 :UInt16;
  height @1 :UInt16;
}

struct Placement {
  id @0 :StringId;
  zone @1 :StringId;
  sizes @2 :List(Size);
  # Retired before any release shipped: ad-level candidates, replaced by `partitions`. Not
  # written; the ordinal stays taken so later fields keep their numbers.
  candidates @3 :List(UInt32);
  # The campaigns that can ever serve here (an ad fits, and some conjunction allows this
  # placement), split by country, each split by priority tier, best first: the serving path
  # draws from these by weight. partitions[0] holds campaigns with a conjunction naming no
  # country (they may serve any country); partitions[k + 1] those that need the country with
  # ordinal k in the index's country values. A request draws from partition 0 and its own
  # country's together; each campaign is in exactly one of the two.
  partitions @4 :List(Partition);
}

struct Partition {
  tiers @0 :List(Tier);
}

struct Tier {
  priority @0 :UInt8;
  campaigns @1 :List(UInt32);           # campaign indexes, ascending
  cumulativeWeights @2 :List(UInt64);   # running sum of campaign weights, for weighted draws
}

# The k-index. A conjunction's size K is the number of attributes it has an IN predicate on.
# Bucket K holds one posting list per (attribute, value) that conjunctions of size K mention.
# A posting entry is (conjunctionId << 1) | isIn, so sorting entries sorts by conjunction id
# with NOT IN (0) before IN (1), as the matching algorithm needs.
struct TargetingIndex {
  attributes @0 :List(AttributeValues);   # position = attribute number (see model.ATTRIBUTES)
  buckets @1 :List(SizeBucket);           # position = K, 0 .. maxK
  zeroEntries @2 :List(UInt32);           # the Z list: an IN entry for every K=0 conjunction
  conjunctions @3 :List(Conjunction);     # by conjunction id
  # Campaign indexes, sliced by Conjunction. A campaign without targeting owns the empty
  # conjunction (K=0, only a Z entry), so it matches every request.
  conjunctionCampaigns @4 :List(UInt32);
  # The same conjunctions in direct form, for checking one campaign without walking the
  # index. conjunctionProgram[id] is the offset in `program` of conjunction `id`, coded as
  #   predicates, then per predicate: attribute << 1 | negated, value count, value ordinals
  # (ascending). Campaign.conjunctions* slice `campaignConjunctions` (conjunction ids).
  # Flat UInt32 lists, so the engine reads them as plain arrays.
  program @5 :List(UInt32);
  conjunctionProgram @6 :List(UInt32);
  campaignConjunctions @7 :List(UInt32);
}

struct AttributeValues {
  name @0 :Text;
  # Distinct values the index mentions for this attribute, sorted by bytes: a request value's
  # ordinal is its position, found by binary search.
  values @1 :List(Text);
  # The same values packed: value i is blob[offsets[i], offsets[i + 1]). The engine's binary
  # search reads these as plain memory.
  blob @2 :Data;
  offsets @3 :List(UInt32);
  # Open-addressing hash table over the values: slot (crc32(value) + probe) mod size holds
  # ordinal + 1, or 0 for empty; size is a power of two at least twice the value count.
  # A request value is found with one hash and, usually, one comparison.
  slots @4 :List(UInt32);
}

struct SizeBucket {
  # Sorted by (attribute, value ordinal), for binary search.
  lists @0 :List(PostingList);
}

struct PostingList {
  attribute @0 :UInt8;
  value @1 :UInt32;            # ordinal into AttributeValues.values
  entries @2 :List(UInt32);    # sorted (conjunctionId << 1 | isIn)
}

struct Conjunction {
  size @0 :UInt8;              # K
  campaignsStart @1 :UInt32;   # slice of TargetingIndex.conjunctionCampaigns
  campaignsCount @2 :UInt32;
}

struct Stats {
  campaigns @0 :UInt32;        # compiled (active) campaigns
  pausedSkipped @1 :UInt32;    # paused campaigns left out
  conjunctions @2 :UInt32;
  postingLists @3 :UInt32;
  postingEntries @4 :UInt64;
  maxConjunctionSize @5 :UInt8;
  # Price and budget bounds over the compiled campaigns: PoPs check them against their limits
  # before activating, and the engine refuses a payload whose campaigns disagree with them.
  maxEcpmMicros @6 :UInt64;
  maxBudgetDailyMicros @7 :UInt64;
}
