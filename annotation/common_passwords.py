"""Commonly used passwords refused by the password policy (NIST SP 800-63B 5.1.1.2:
"passwords obtained from previous breach corpuses" and "dictionary words"). A short list of
the most frequent entries of public breach-frequency lists (for example the SecLists top
lists), folded to lower case, plus a few words of this product. Passwords are compared
casefolded, with spaces removed and with trailing digits or punctuation stripped."""

COMMON_PASSWORDS = frozenset(
    w for w in """
123456 password 12345678 qwerty 123456789 12345 1234 111111 1234567 dragon 123123 baseball
abc123 football monkey letmein 696969 shadow master 666666 qwertyuiop 123321 mustang 1234567890
michael 654321 superman 1qaz2wsx 7777777 121212 000000 qazwsx 123qwe killer trustno1 jordan
jennifer zxcvbnm asdfgh hunter buster soccer harley batman andrew tigger sunshine iloveyou
2000 charlie robert thomas hockey ranger daniel starwars klaster 112233 george computer
michelle jessica pepper 1111 zxcvbn 555555 11111111 131313 freedom 777777 pass maggie
159753 aaaaaa ginger princess joshua cheese amanda summer love ashley nicole chelsea
biteme matthew access yankees 987654321 dallas austin thunder taylor matrix mobilemail mom
monitor monitoring montana moon moscow william corvette hello martin heather secret merlin
diamond 1234qwer gfhjkm hammer silver 222222 88888888 anthony justin test bailey q1w2e3r4t5
patrick internet scooter orange 11111 golfer cookie richard samantha bigdog guitar jackson
whatever mickey chicken sparky snoopy maverick phoenix camaro peanut morgan welcome falcon
cowboy ferrari samsung andrea smokey steelers joseph mercedes dakota arsenal eagles melissa
boomer booboo spider nascar monster tigers yellow xxxxxx 123123123 gateway marina diablo
bulldog qwer1234 compaq purple hardcore banana junior hannah 123654 porsche lakers iceman
money cowboys 987654 london tennis 999999 ncc1701 coffee scooby 0000 miller boston
q1w2e3r4 fuckoff brandon yamaha chester mother forever johnny edward 333333 oliver redsox
player nikita knight fender barney midnight please brandy chicago badboy slayer rangers
charles angel flower bigdaddy rabbit wizard bigdick jasper enter rachel chris steven
winner adidas victoria natasha 1q2w3e4r jasmine winter prince panties marine ghbdtn fishing
cocacola casper james 232323 raiders 888888 marlboro gandalf asdfasdf crystal 87654321 12344321
golden 8675309 blowme blue butter zaq12wsx passw0rd p@ssw0rd p@ssword password1 password12 password123
passwort motdepasse contrasena admin administrator admin123 root toor changeme default guest user
login welcome1 qwerty123 qwerty1 1q2w3e 1q2w3e4r5t abcd1234 abcdef abcdefg abcdefgh iloveyou1 letmein1
trustno1 sunshine1 princess1 football1 baseball1 monkey1 dragon1 master1 shadow1 superman1 batman1 michael1
secret1 starwars1 whatever1 qazwsxedc 1qazxsw2 zaq1zaq1 asdf1234 zxcv1234 computer1 internet1 samsung1 google
facebook linkedin myspace1 password! password1! welcome123 changeme123 letmein123 hello123 iloveu 123abc abc12345
annotation annotator align rlhf chatgpt openai
""".split()
)
